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
    """y = [gelu ->  W2] (LayerNorm(x) W1^T + b1); see the module doc. x [R, d] (2-D), w2 None: one Linear."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps: float, w1, b1, w2, approximate: str):
        d = x.shape[-1]
        ln, mean, rstd = aten.native_layer_norm(x, [d], ln_w, ln_b, eps)
        u = F.linear(ln, w1, b1)  # under autocast: the autocast dtype
        dt = u.dtype
        acc = _acc(x.dtype)
        xhat = ((x.to(acc) - mean) * rstd).to(dt)
        ctx.eps, ctx.approximate, ctx.x_dtype = eps, approximate, x.dtype
        ctx.has_b1, ctx.mlp = b1 is not None, w2 is not None
        if w2 is None:
            ctx.save_for_backward(xhat, rstd, ln_w, ln_b, w1)
            return u
        ctx.save_for_backward(xhat, rstd, ln_w, ln_b, w1, u, w2)
        return F.linear(F.gelu(u, approximate=approximate), w2)

    @staticmethod
    def backward(ctx, gy):
        if ctx.mlp:
            xhat, rstd, ln_w, ln_b, w1, u, w2 = ctx.saved_tensors
        else:
            xhat, rstd, ln_w, ln_b, w1 = ctx.saved_tensors
            u = w2 = None
        dt = xhat.dtype
        acc = rstd.dtype
        n = ctx.needs_input_grad
        gy = gy.to(dt)
        gw2 = None
        if ctx.mlp:
            if n[6]:
                gw2 = (gy.t() @ F.gelu(u, approximate=ctx.approximate)).to(w2.dtype)
            gu = aten.gelu_backward(gy @ w2.to(dt), u, approximate=ctx.approximate)
        else:
            gu = gy
        xh = xhat.to(acc)
        gw1 = gb1 = gx = g_lnw = g_lnb = None
        if n[4]:
            ln = (xh * ln_w.to(acc) + ln_b.to(acc)).to(dt)  # the LayerNorm's output as the GEMM read it
            gw1 = (gu.t() @ ln).to(w1.dtype)
        if ctx.has_b1 and n[5]:
            gb1 = gu.sum(0, dtype=acc).to(w1.dtype)
        if n[0] or n[1] or n[2]:
            g_ln = (gu @ w1.to(dt)).to(acc)
            if n[1]:
                g_lnw = (g_ln * xh).sum(0).to(ln_w.dtype)
            if n[2]:
                g_lnb = g_ln.sum(0).to(ln_b.dtype)
            if n[0]:
                g = g_ln * ln_w.to(acc)
                gx = (rstd * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))).to(ctx.x_dtype)
        return gx, g_lnw, g_lnb, None, gw1, gb1, gw2, None


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
    y = _LayerNormLinear.apply(x.reshape(-1, shape[-1]), ln_weight, ln_bias, float(eps), weight, bias, None, "none")
    return y.view(*shape[:-1], y.shape[-1])


def layernorm_gelu_mlp(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                       w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, *,
                       approximate: str = "none") -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(F.layer_norm(x, ...), w1, b1), approximate=...), w2)`` (the pre-LN MLP without its
    output bias) keeping the normalised input, a statistic per row and the GELU's input (see the module doc)."""
    _check("layernorm_gelu_mlp", x, ln_weight, ln_bias, w1)
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"layernorm_gelu_mlp: w2 must be [out, {w1.shape[0]}], got {list(w2.shape)}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"layernorm_gelu_mlp: approximate must be 'none' or 'tanh', got {approximate!r}")
    shape = x.shape
    y = _LayerNormLinear.apply(x.reshape(-1, shape[-1]), ln_weight, ln_bias, float(eps), w1, b1, w2, approximate)
    return y.view(*shape[:-1], y.shape[-1])
