"""Post-LN block epilogue: ``y = LayerNorm(dropout(x + bias) + residual)``.

Every BERT/Q-Former sub-block ends with it (attention output and FFN output), and in eager PyTorch it
is four kernels and three round trips of the activation through memory. The fused CUDA kernel
(csrc/layernorm_epilogue.cu) reads x and residual once and writes y, plus the pre-norm sum z and the
row statistics that backward needs; the dropout mask is never stored: backward regenerates it from the
call's Philox seed (the rule of ops/_philox.py on the [R, N] view: element (r, c) uses word c % 4 of the
Philox call with counter r * ceil(N / 4) + c // 4).

x and residual [..., N] (same shape, fp32/fp16/bf16; promoted to a common dtype, which is the output
dtype), bias None or [N], weight and ln_bias [N] (any float dtype; the math is fp32).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common as C
from ._philox import dropout_keep_mask_2d, new_seed

_OP = "bias_dropout_add_layernorm"
_SUPPORTED = ("cuda", "torch")


def _keep_scale(seed, shape, device, p, dtype):
    rows, n = shape
    return dropout_keep_mask_2d(seed, rows, n, p, device).to(dtype) / (1.0 - p)


def bias_dropout_add_layernorm_ref(x, bias, residual, weight, ln_bias, *, eps=1e-12, dropout_p=0.0, seed=None):
    """Pure-PyTorch reference; differentiable. Without a seed, dropout is torch's own."""
    h = x if bias is None else x + bias
    if dropout_p > 0.0:
        if seed is not None:
            n = x.shape[-1]
            h = h * _keep_scale(seed, (x.numel() // max(n, 1), n), x.device, dropout_p, h.dtype).view(x.shape)
        else:
            h = F.dropout(h, dropout_p, training=True)
    return F.layer_norm(h + residual, (x.shape[-1],), weight, ln_bias, eps)


# ----------------------------------------------------------------------------------------------
# torch implementation of the fused contract (2-D, explicit statistics), used by the custom op


def _fwd_torch(x, bias, residual, weight, ln_bias, seed, eps, dropout_p):
    acc = C.acc_dtype(x)
    h = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    if dropout_p > 0.0:
        h = h * _keep_scale(seed, x.shape, x.device, dropout_p, acc)
    # statistics and y come from z as stored (rounded to x's dtype): backward sees only that z, and stats of
    # the unrounded sum would make its xhat inconsistent (N = 1: rstd = 1/sqrt(eps) times a rounding error)
    z = (h + residual.to(acc)).to(x.dtype).to(acc)
    mean, rstd = _row_stats(z, eps)
    y = (z - mean[:, None]) * rstd[:, None] * weight.to(acc) + ln_bias.to(acc)
    return y.to(x.dtype), z.to(x.dtype), torch.stack([mean, rstd])


def _row_stats(z, eps):
    """(mean, rstd) of the rows of z: the corrected two-pass rule of the CUDA kernels. mean = m0 + mean(z - m0)
    with m0 = mean(z) puts a row of one value c at exactly c (m0 alone can be an ulp off, and with eps = 1e-12 an
    ulp times 1/sqrt(eps) is a visible error in y); var = mean(d * (d / N)) - mean(d)^2 with d = z - m0 (the
    scaling keeps |d| up to ~1e20 finite in fp32, where summing d^2 first overflows; beyond, var = inf and
    rstd = 0), never below 0; NaN stays NaN."""
    inv_n = 1.0 / z.shape[1]
    m0 = z.mean(dim=1)
    d = z - m0[:, None]
    m1 = d.mean(dim=1)
    e2 = (d * (d * inv_n)).sum(dim=1)
    var = torch.where(e2 == float("inf"), e2, e2 - m1 * m1)  # inf - inf would be NaN
    var = torch.where(var < 0, 0.0, var)
    return m0 + m1, torch.rsqrt(var + eps)


def _bwd_torch(dy, z, stats, weight, seed, dropout_p):
    mean, rstd = stats[0], stats[1]
    acc = mean.dtype
    xhat = (z.to(acc) - mean[:, None]) * rstd[:, None]
    dyf = dy.to(acc)
    g = dyf * weight.to(acc)
    dz = rstd[:, None] * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    dweight = (dyf * xhat).sum(dim=0)
    dln_bias = dyf.sum(dim=0)
    if dropout_p > 0.0:
        dx = dz * _keep_scale(seed, z.shape, z.device, dropout_p, acc)
        dbias = dx.sum(dim=0)
        return dx.to(z.dtype), dz.to(z.dtype), dweight, dln_bias, dbias
    return z.new_empty(0), dz.to(z.dtype), dweight, dln_bias, dz.sum(dim=0)


@torch.library.custom_op("blipfast::bias_dropout_add_layernorm_fwd", mutates_args=())
def _fwd(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
         ln_bias: torch.Tensor, seed: Optional[torch.Tensor], eps: float, dropout_p: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [R, N] contiguous; weight, ln_bias, bias [N] fp32. Returns (y, z, stats) with stats [2, R] =
    (mean, rstd) of each row in the accumulation dtype (one output for autograd to save, not two)."""
    with C.no_autocast(x.device):
        if backend == "cuda":
            return tuple(torch.ops.blipfast_C.ln_epilogue_fwd(x, bias, residual, weight, ln_bias, seed, eps, dropout_p))
        return _fwd_torch(x, bias, residual, weight, ln_bias, seed, eps, dropout_p)


@_fwd.register_fake
def _fwd_fake(x, bias, residual, weight, ln_bias, seed, eps, dropout_p, backend):
    rows = x.shape[0]
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((2, rows), dtype=C.acc_dtype(x))


@torch.library.custom_op("blipfast::bias_dropout_add_layernorm_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, z: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor, seed: Optional[torch.Tensor],
         dropout_p: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dresidual, dweight, dln_bias, dbias); dx is empty when dropout_p == 0 (dx == dresidual)."""
    with C.no_autocast(dy.device):
        if backend == "cuda":
            return tuple(torch.ops.blipfast_C.ln_epilogue_bwd(dy, z, stats, weight, seed, dropout_p))
        return _bwd_torch(dy, z, stats, weight, seed, dropout_p)


@_bwd.register_fake
def _bwd_fake(dy, z, stats, weight, seed, dropout_p, backend):
    n = z.shape[1]
    dx = z.new_empty(z.shape) if dropout_p > 0.0 else z.new_empty(0)
    acc = stats.dtype
    return dx, z.new_empty(z.shape), z.new_empty(n, dtype=acc), z.new_empty(n, dtype=acc), z.new_empty(n, dtype=acc)


def _setup_context(ctx, inputs, output):
    x, bias, residual, weight, ln_bias, seed, eps, dropout_p, backend = inputs
    y, z, stats = output
    ctx.save_for_backward(z, stats, weight, seed)
    ctx.set_materialize_grads(False)  # z and stats get no gradient: no zero-filled tensors for them
    ctx.args = (dropout_p, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, dz_unused, dstats_unused):
    if dy is None:
        return (None,) * 9
    z, stats, weight, seed = ctx.saved_tensors
    dropout_p, backend = ctx.args
    dx, dres, dweight, dln_bias, dbias = _bwd(dy.contiguous(), z, stats, weight, seed, dropout_p, backend)
    if dropout_p == 0.0:
        dx = dres
    return dx, (dbias if ctx.has_bias else None), dres, dweight, dln_bias, None, None, None, None


torch.library.register_autograd("blipfast::bias_dropout_add_layernorm_fwd", _backward, setup_context=_setup_context)


def bias_dropout_add_layernorm(x, bias, residual, weight, ln_bias, *, eps=1e-12, dropout_p=0.0, seed=None,
                               backend=None):
    """``LayerNorm(dropout(x + bias) + residual)`` over the last dimension, fused on CUDA.

    ``seed`` (int or int64 tensor with one element) fixes the dropout mask (the Philox rule, identical on
    every backend); by default a fresh one is drawn on the device from torch's RNG (no host sync), and the
    "torch" backend uses torch's own dropout.
    """
    C.check_tensor(_OP, "x", x)
    dev = x.device
    C.check_tensor(_OP, "residual", residual, device=dev)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{_OP}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"{_OP}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("ln_bias", ln_bias), ("bias", bias)):
        if t is None and name == "bias":
            continue
        C.check_tensor(_OP, name, t, device=dev)
        C.check_shape(_OP, name, t, (n,))
    eps = C.check_positive_float(_OP, "eps", eps, allow_none=False)
    dropout_p = C.check_probability(_OP, "dropout_p", dropout_p)
    seed = C.check_seed(_OP, seed, dev)
    dtype = x.dtype if x.dtype == residual.dtype else torch.promote_types(x.dtype, residual.dtype)
    f32 = torch.finfo(torch.float32)
    if dtype != torch.float64 and not f32.tiny <= eps <= f32.max:
        # fp32 math: a smaller eps rounds to a subnormal or 0 (rsqrt(0) = inf makes a constant row 0 * inf = NaN)
        raise ValueError(f"{_OP}: eps must be a normal float32 number (>= {f32.tiny:.4g}, <= {f32.max:.4g}) for "
                         f"{str(dtype).replace('torch.', '')} inputs, got {eps}")
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, dtype)
    if backend == "torch" and dropout_p > 0.0 and seed is None:
        # nothing to reproduce: plain autograd with torch's own dropout (the Philox rule in PyTorch is slow)
        return bias_dropout_add_layernorm_ref(x.to(dtype), bias, residual.to(dtype), weight, ln_bias, eps=eps,
                                              dropout_p=dropout_p).to(dtype)
    if dropout_p > 0.0 and seed is None:
        seed = new_seed(dev)
    shape = x.shape
    x2 = x.to(dtype).reshape(-1, n).contiguous()
    r2 = residual.to(dtype).reshape(-1, n).contiguous()
    pdt = C.acc_dtype(x2)
    y = _fwd(x2, None if bias is None else bias.to(pdt), r2, weight.to(pdt), ln_bias.to(pdt),
             seed if dropout_p > 0.0 else None, eps, dropout_p, backend)[0]
    return y.view(shape)
