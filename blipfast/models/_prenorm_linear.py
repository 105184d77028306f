"""The two halves of a pre-LN transformer block as autograd Functions that keep less for the backward.

A pre-LN block (ViT, EVA ViT-g) runs ``LayerNorm -> Linear`` twice: before the attention's QKV projection and
before the MLP. In plain autograd the LayerNorm keeps its input (the residual stream, float32 under autocast) and
the Linear keeps the LayerNorm's output again, in its compute dtype; the MLP also keeps its GELU's input and its
GELU's output. ``layernorm_linear`` and ``layernorm_gelu_mlp`` keep only

- the normalised input ``xhat = (x - mean) * rstd`` in the GEMM's dtype (bfloat16 under bf16 autocast, the
  input's dtype otherwise) and ``rstd`` per row: the backward rebuilds the LayerNorm's output
  ``xhat * weight + bias`` for the weight gradient and runs the LayerNorm backward from ``xhat``;
- for the MLP, the GELU's input (its output is recomputed in the backward, as ``gelu_mlp`` does);
- references to the Parameters (no weight copies: each is cast to the GEMM dtype again in the backward).

No GEMM is recomputed, so the FLOPs are plain autograd's. The forward computes the LayerNorm with
``aten.native_layer_norm`` (PyTorch's own kernel, float32 under autocast as autocast runs ``layer_norm``), so
outputs are those of ``nn.LayerNorm`` followed by ``nn.Linear``; in float32 the backward differs from autograd's only
in rounding. Under autocast the LayerNorm backward reads ``xhat`` rounded to bfloat16 (autograd would read the
float32 stream): an error of the order of the bfloat16 rounding its GEMMs have anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _acc(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


class _LayerNormLinear(torch.autograd.Function):
    """y = LayerNorm(x) W^T + b, x [R, d]; saves xhat (GEMM dtype), rstd and references to the Parameters."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps: float, w, b):
        d = x.shape[-1]
        ln, mean, rstd = aten.native_layer_norm(x, [d], ln_w, ln_b, eps)
        y = F.linear(ln, w, b)  # under autocast: the autocast dtype
        xhat = ((x.to(_acc(x.dtype)) - mean) * rstd).to(y.dtype)
        ctx.x_dtype, ctx.has_b = x.dtype, b is not None
        ctx.save_for_backward(xhat, rstd, ln_w, ln_b, w)
        return y

    @staticmethod
    def backward(ctx, gy):
        xhat, rstd, ln_w, ln_b, w = ctx.saved_tensors
        dt, acc, n = xhat.dtype, rstd.dtype, ctx.needs_input_grad
        gy = gy.to(dt)
        xh = xhat.to(acc)
        gw = gb = gx = g_lnw = g_lnb = None
        if n[4]:
            ln = (xh * ln_w.to(acc) + ln_b.to(acc)).to(dt)  # the LayerNorm's output as the GEMM read it
            gw = (gy.t() @ ln).to(w.dtype)
        if ctx.has_b and n[5]:
            gb = gy.sum(0, dtype=acc).to(w.dtype)
        if n[0] or n[1] or n[2]:
            g_ln = (gy @ w.to(dt)).to(acc)
            if n[1]:
                g_lnw = (g_ln * xh).sum(0).to(ln_w.dtype)
            if n[2]:
                g_lnb = g_ln.sum(0).to(ln_b.dtype)
            if n[0]:
                g = g_ln * ln_w.to(acc)
                gx = (rstd * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))).to(ctx.x_dtype)
        return gx, g_lnw, g_lnb, None, gw, gb


class _GeluLinear(torch.autograd.Function):
    """y = gelu(u) W^T, u [R, f]; saves u (the GELU is recomputed in the backward) and a reference to W."""

    @staticmethod
    def forward(ctx, u, w, approximate: str, compute_output: bool):
        if compute_output:
            y = F.linear(F.gelu(u, approximate=approximate), w)
        else:  # a checkpoint's recomputation: only the saved tensors are wanted, the GEMM is skipped
            y = F.linear(u[:0], w).new_zeros(()).expand(u.shape[0], w.shape[0])  # dtype as the GEMM's
        ctx.approximate, ctx.u_dtype = approximate, u.dtype
        ctx.save_for_backward(u.to(y.dtype), w)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, w = ctx.saved_tensors
        dt = u.dtype
        gy = gy.to(dt)
        gw = (gy.t() @ F.gelu(u, approximate=ctx.approximate)).to(w.dtype) if ctx.needs_input_grad[1] else None
        gu = None
        if ctx.needs_input_grad[0]:
            gu = aten.gelu_backward(gy @ w.to(dt), u, approximate=ctx.approximate).to(ctx.u_dtype)
        return gu, gw, None, None


def _check(name: str, x, ln_w, ln_b, w1) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"{name}: x must be a tensor [..., d], got {type(x).__name__}")
    d = x.shape[-1]
    if ln_w is None or ln_b is None or ln_w.shape != (d,) or ln_b.shape != (d,):
        raise ValueError(f"{name}: the LayerNorm needs a weight and a bias of shape [{d}]")
    if w1.dim() != 2 or w1.shape[1] != d:
        raise ValueError(f"{name}: weight must be [out, {d}], got {list(w1.shape)}")


def layernorm_linear(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                     weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(F.layer_norm(x, (d,), ln_weight, ln_bias, eps), weight, bias)`` keeping only the normalised input
    (in the GEMM's dtype) and a statistic per row for the backward (see the module doc)."""
    _check("layernorm_linear", x, ln_weight, ln_bias, weight)
    shape = x.shape
    y = _LayerNormLinear.apply(x.reshape(-1, shape[-1]), ln_weight, ln_bias, float(eps), weight, bias)
    return y.view(*shape[:-1], y.shape[-1])


def gelu_linear(u: torch.Tensor, weight: torch.Tensor, *, approximate: str = "none",
                compute_output: bool = True) -> torch.Tensor:
    """``F.linear(F.gelu(u, approximate=approximate), weight)`` keeping only ``u`` for the backward (the GELU's output
    is recomputed there). ``compute_output=False`` skips the GEMM and returns zeros (an expanded scalar) while the
    node saves what its backward needs: for a checkpoint's recomputation, which only wants the saved tensors."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_linear: approximate must be 'none' or 'tanh', got {approximate!r}")
    if weight.dim() != 2 or weight.shape[1] != u.shape[-1]:
        raise ValueError(f"gelu_linear: weight must be [out, {u.shape[-1]}], got {list(weight.shape)}")
    shape = u.shape
    y = _GeluLinear.apply(u.reshape(-1, shape[-1]), weight, approximate, bool(compute_output))
    return y.view(*shape[:-1], y.shape[-1])


def layernorm_gelu_mlp(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                       w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, *,
                       approximate: str = "none", compute_output: bool = True) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(F.layer_norm(x, ...), w1, b1), approximate=...), w2)`` (the pre-LN MLP without its
    output bias): ``gelu_linear(layernorm_linear(...))``, keeping the normalised input, a statistic per row and the
    GELU's input. ``compute_output``: see :func:`gelu_linear`."""
    u = layernorm_linear(x, ln_weight, ln_bias, eps, w1, b1)
    return gelu_linear(u, w2, approximate=approximate, compute_output=compute_output)
