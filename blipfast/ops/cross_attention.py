"""Q-Former cross-attention to image tokens with shared image K/V.

Contract (docs/ops.md#cross_attention): q [N, Lq, H, D]; k, v [M, Lk, H, D] for M distinct images; kv_index long [N] in
[0, M) names the image each row-set attends to (default arange, N == M); key_padding_mask [M, Lk] per
image (true = attend). Gradients of k and v sum over every row-set that used them, so an image's K/V
projection is computed once and shared by ITC, ITM (positive and negative pairs) and retrieval
re-ranking. A row whose image has no unpadded key outputs 0. Dropout keeps (n, h, i, j) iff the Philox
rule (ops/_philox.py) keeps element ((n * H + h) * Lq + i, j) of the logical [N * H * Lq, Lk] view (word
j % 4 of the call with counter row * ceil(Lk / 4) + j // 4).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _common as C
from ._attention_ref import attention_bwd_ref, attention_fwd_ref
from ._philox import new_seed

_OP = "cross_attention"
_SUPPORTED = ("triton", "torch")


def _expand(k, v, kv_index, key_padding_mask, lq):
    """K/V (and the allowed mask) of each row-set: the materialised copies the kernels avoid."""
    if kv_index is not None:
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.index_select(0, kv_index)
    if key_padding_mask is None:
        allowed = torch.ones(1, lq, k.shape[1], dtype=torch.bool, device=k.device)
    else:
        allowed = key_padding_mask.to(torch.bool)[:, None, :].expand(-1, lq, -1)
    return k, v, allowed


def cross_attention_ref(q, k, v, *, kv_index=None, key_padding_mask=None, dropout_p=0.0, scale=None, seed=None):
    """Pure-PyTorch reference (the CPU path and the ground truth of the kernels); differentiable."""
    ke, ve, allowed = _expand(k, v, kv_index, key_padding_mask, q.shape[1])
    return attention_fwd_ref(q, ke, ve, allowed, dropout_p=dropout_p, scale=scale, seed=seed)[0]


@torch.library.custom_op("blipfast::cross_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: Optional[torch.Tensor],
         key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float, scale: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with C.no_autocast(q.device):
        if backend == "triton":
            from ..kernels import attention as kern

            return kern.cross_attention_fwd(q, k, v, kv_index, key_padding_mask, seed, dropout_p, scale)
        ke, ve, allowed = _expand(k, v, kv_index, key_padding_mask, q.shape[1])
        out, lse = attention_fwd_ref(q, ke, ve, allowed, dropout_p=dropout_p, scale=scale, seed=seed)
        return out.contiguous(), lse


@_fwd.register_fake
def _fwd_fake(q, k, v, kv_index, key_padding_mask, seed, dropout_p, scale, backend):
    n, lq, h, d = q.shape
    acc = torch.float64 if backend == "triton" else C.acc_dtype(q)  # the kernels' lse is fp64
    return q.new_empty(n, lq, h, d), q.new_empty((n, h, lq), dtype=acc)


@torch.library.custom_op("blipfast::cross_attention_bwd", mutates_args=())
def _bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, kv_index: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
         seed: Optional[torch.Tensor], dropout_p: float, scale: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with C.no_autocast(q.device):
        if backend == "triton":
            from ..kernels import attention as kern

            return kern.cross_attention_bwd(grad_out, q, k, v, out, lse, kv_index, key_padding_mask, seed, dropout_p,
                                            scale)
        ke, ve, allowed = _expand(k, v, kv_index, key_padding_mask, q.shape[1])
        dq, dk, dv = attention_bwd_ref(grad_out, q, ke, ve, allowed, dropout_p=dropout_p, scale=scale, seed=seed)
        if kv_index is not None:
            dk = torch.zeros(k.shape, dtype=dk.dtype, device=dk.device).index_add_(0, kv_index, dk)
            dv = torch.zeros(v.shape, dtype=dv.dtype, device=dv.device).index_add_(0, kv_index, dv)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, kv_index, key_padding_mask, seed, dropout_p, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_index, kpm, seed, dropout_p, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_index, kpm, seed)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero-filled tensor for it
    ctx.args = (dropout_p, scale, backend)


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 9
    q, k, v, out, lse, kv_index, kpm, seed = ctx.saved_tensors
    dq, dk, dv = _bwd(grad_out.contiguous(), q, k, v, out, lse, kv_index, kpm, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("blipfast::cross_attention_fwd", _backward, setup_context=_setup_context)


def cross_attention(q, k, v, *, kv_index=None, key_padding_mask=None, dropout_p=0.0, scale=None, seed=None,
                    backend=None):
    """Cross-attention of N row-sets over M images' shared K/V; returns [N, Lq, H, D] (see module doc).

    ``seed`` fixes the dropout mask as in ``qformer_attention``. A ``kv_index`` value outside [0, M) is an
    error on every backend: a ValueError naming ``kv_index`` for CPU tensors; on CUDA (and under
    torch.compile) a device-side assert (``torch._assert_async``, no host sync, capturable) that surfaces at
    the next synchronisation. The kernels never read or write out of bounds for such an index.
    """
    C.check_tensor(_OP, "q", q, ndim=4)
    dev = q.device
    C.check_tensor(_OP, "k", k, ndim=4, device=dev)
    C.check_tensor(_OP, "v", v, ndim=4, device=dev)
    C.check_same_dtype(_OP, q=q, k=k, v=v)
    n, lq, h, d = q.shape
    m, lk = k.shape[0], k.shape[1]
    if d == 0:
        raise ValueError(f"{_OP}: q must have a non-empty head dimension, got shape {tuple(q.shape)}")
    C.check_shape(_OP, "k", k, (None, None, h, d))
    C.check_shape(_OP, "v", v, (m, lk, h, d))
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_inner_contiguous(_OP, name, t)
    if kv_index is None:
        if n != m:
            raise ValueError(f"{_OP}: without kv_index q and k need the same first dimension (N == M), got "
                             f"N={n}, M={m}")
    else:
        C.check_tensor(_OP, "kv_index", kv_index, dtypes=(torch.int64, torch.int32), device=dev)
        C.check_shape(_OP, "kv_index", kv_index, (n,))
        kv_index = kv_index.to(torch.int64).contiguous()
        C.check_index_range(_OP, "kv_index", kv_index, m, f"M = k.shape[0] = {m} images")
    kpm = C.as_key_padding_mask(_OP, "key_padding_mask", key_padding_mask, (m, lk), dev)
    dropout_p = C.check_probability(_OP, "dropout_p", dropout_p)
    scale = C.check_positive_float(_OP, "scale", scale)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    seed = C.check_seed(_OP, seed, dev)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, q.dtype)
    if backend == "torch" and dropout_p > 0.0 and seed is None:
        # nothing to reproduce: plain autograd with torch's own dropout (the Philox rule in PyTorch
        # costs ~120 integer passes per element, which would dominate CPU training)
        return cross_attention_ref(q, k, v, kv_index=kv_index, key_padding_mask=kpm, dropout_p=dropout_p,
                                   scale=scale)
    if dropout_p > 0.0 and seed is None:
        seed = new_seed(dev)
    return _fwd(q, k, v, kv_index, kpm, seed if dropout_p > 0.0 else None, dropout_p, scale, backend)[0]
