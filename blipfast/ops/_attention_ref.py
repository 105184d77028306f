"""Shared pure-PyTorch attention math of the two attention ops (reference forward and backward).

Conventions shared with the Triton kernels: computation in fp32 (fp64 for fp64 inputs); a row with no allowed key outputs 0
and gets no gradient; with a ``seed``, dropout keeps (b, h, i, j) iff the Philox rule of _philox.py keeps
element (row, col) = ((b * H + h) * Lq + i, j) of the logical [B * H * Lq, Lk] view (word j % 4 of counter
row * ceil(Lk / 4) + j // 4); without a seed (direct reference calls only) torch's own dropout is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import acc_dtype
from ._philox import dropout_keep_mask_2d


def dropout_keep(seed, b: int, h: int, lq: int, lk: int, p: float, device) -> torch.Tensor:
    """bool [B, H, Lq, Lk] keep-mask of the attention-probability dropout: the [B * H * Lq, Lk] view of the
    Philox rule of _philox.py (rows (b * H + h) * Lq + i, columns j)."""
    return dropout_keep_mask_2d(seed, b * h * lq, lk, p, device).view(b, h, lq, lk)


def _probs(q, k, allowed, scale):
    acc = acc_dtype(q)
    s = torch.einsum("bihd,bjhd->bhij", q.to(acc), k.to(acc)) * scale
    allowed = allowed.unsqueeze(1)  # [B, 1, Lq, Lk]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for a row with no allowed key
    has_any = allowed.any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(has_any, s, torch.zeros_like(s)), dim=-1)
    return p.masked_fill(~allowed, 0.0), lse


def _keep_scale(seed, p, shape, device, dropout_p):
    b, h, lq, lk = shape
    keep = dropout_keep(seed, b, h, lq, lk, dropout_p, device)
    return keep.to(p.dtype) / (1.0 - dropout_p)


def attention_fwd_ref(q, k, v, allowed, *, dropout_p=0.0, scale=None, seed=None):
    """Attention of q [B, Lq, H, D] over k, v [B, Lk, H, D] under a bool mask broadcastable to
    [B, Lq, Lk]. Differentiable; returns (out in q.dtype, lse [B, H, Lq] in the accumulation dtype)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, lse = _probs(q, k, allowed, scale)
    if dropout_p > 0.0:
        if seed is not None:
            p = p * _keep_scale(seed, p, p.shape, q.device, dropout_p)
        else:
            p = F.dropout(p, dropout_p, training=True)
    out = torch.einsum("bhij,bjhd->bihd", p, v.to(p.dtype))
    return out.to(q.dtype), lse


def attention_bwd_ref(grad_out, q, k, v, allowed, *, dropout_p=0.0, scale=None, seed=None):
    """Analytic backward of attention_fwd_ref (with a seed when dropout_p > 0): (dq, dk, dv)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, _ = _probs(q, k, allowed, scale)
    acc = acc_dtype(q)
    do = grad_out.to(acc)
    vf = v.to(acc)
    pd = p
    if dropout_p > 0.0:
        ks = _keep_scale(seed, p, p.shape, q.device, dropout_p)
        pd = p * ks
    dv = torch.einsum("bhij,bihd->bjhd", pd, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, vf)
    if dropout_p > 0.0:
        dp = dp * ks
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = torch.einsum("bhij,bjhd->bihd", ds, k.to(acc)) * scale
    dk = torch.einsum("bhij,bihd->bjhd", ds, q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
