"""Q-Former self-attention with the three stage-1 masks computed from indices
(docs/semantics.md#stage-1-attention-masks).

Contract (docs/ops.md#qformer_attention): q [B, Lq, H, D]; k, v [B, Lk, H, D]; Lq <= Lk and the q rows are the LAST Lq
positions of the Lk-long sequence. Positions < num_query are learned queries, the rest text.
allowed(i, j), with i the row's position in the Lk-long sequence:

    bidirectional   every j
    causal          query row: j < Q          text row: j < Q or j <= i
    unimodal        query row: j < Q          text row: j >= Q
    itc_itg         the sequence is [Q queries | T text (ITC) | T text (ITG)], Lk = Q + 2T:
                    query row: j < Q;  ITC text row: Q <= j < Q + T;  ITG text row: j < Q or Q + T <= j <= i
                    (ITC's unimodal pass and ITG's causal pass over the same queries, in one pass)

intersected with key_padding_mask[b, j] (true = attend). A row with no allowed key outputs 0 and
gets no gradient. Dropout on the attention probabilities keeps element (b, h, i, j) iff the blipfast
Philox rule (ops/_philox.py) keeps element (row, col) = ((b * H + h) * Lq + i, j) of the logical
[B * H * Lq, Lk] view under the call's seed: word j % 4 of the Philox call with counter
row * ceil(Lk / 4) + j // 4.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _common as C
from ._attention_ref import attention_bwd_ref, attention_fwd_ref
from ._philox import new_seed

MODES = ("bidirectional", "causal", "unimodal", "itc_itg")
_OP = "qformer_attention"
_SUPPORTED = ("triton", "torch")


def allowed_mask(num_query: int, mode: str, lq: int, lk: int, device, key_padding_mask=None) -> torch.Tensor:
    """Boolean [B or 1, Lq, Lk] mask of allowed (row, key) pairs: the mask the kernels never build."""
    i = torch.arange(lk - lq, lk, device=device).view(lq, 1)
    j = torch.arange(lk, device=device).view(1, lk)
    q_row = i < num_query
    q_key = j < num_query
    if mode == "bidirectional":
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    elif mode == "causal":
        allowed = q_key | (~q_row & (j <= i))
    elif mode == "unimodal":
        allowed = torch.where(q_row, q_key, ~q_key)
    elif mode == "itc_itg":
        t = (lk - num_query) // 2

        def block(x):  # 0: queries, 1: ITC text, 2: ITG text
            return (x >= num_query).long() + (x >= num_query + t).long()

        bi, bj = block(i), block(j)
        allowed = ((bi == bj) & ((bi != 2) | (j <= i))) | ((bi == 2) & (bj == 0))
    else:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    allowed = allowed.unsqueeze(0)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(torch.bool)[:, None, :]
    return allowed


def qformer_attention_ref(q, k, v, *, num_query, mode, key_padding_mask=None, dropout_p=0.0, scale=None, seed=None):
    """Pure-PyTorch reference (the CPU path and the ground truth of the kernels); differentiable."""
    allowed = allowed_mask(num_query, mode, q.shape[1], k.shape[1], q.device, key_padding_mask)
    return attention_fwd_ref(q, k, v, allowed, dropout_p=dropout_p, scale=scale, seed=seed)[0]


# ----------------------------------------------------------------------------------------------
# custom ops: forward returns (out, lse); backward is its own op so that torch.compile sees both


@torch.library.custom_op("blipfast::qformer_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
         seed: Optional[torch.Tensor], num_query: int, mode: str, dropout_p: float, scale: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with C.no_autocast(q.device):
        if backend == "triton":
            from ..kernels import attention as kern

            return kern.qformer_attention_fwd(q, k, v, key_padding_mask, seed, num_query, mode, dropout_p, scale)
        allowed = allowed_mask(num_query, mode, q.shape[1], k.shape[1], q.device, key_padding_mask)
        out, lse = attention_fwd_ref(q, k, v, allowed, dropout_p=dropout_p, scale=scale, seed=seed)
        return out.contiguous(), lse


@_fwd.register_fake
def _fwd_fake(q, k, v, key_padding_mask, seed, num_query, mode, dropout_p, scale, backend):
    b, lq, h, d = q.shape
    acc = torch.float64 if backend == "triton" else C.acc_dtype(q)  # the kernels' lse is fp64
    return q.new_empty(b, lq, h, d), q.new_empty((b, h, lq), dtype=acc)


@torch.library.custom_op("blipfast::qformer_attention_bwd", mutates_args=())
def _bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor], num_query: int,
         mode: str, dropout_p: float, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with C.no_autocast(q.device):
        if backend == "triton":
            from ..kernels import attention as kern

            return kern.qformer_attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, seed, num_query, mode,
                                              dropout_p, scale)
        allowed = allowed_mask(num_query, mode, q.shape[1], k.shape[1], q.device, key_padding_mask)
        dq, dk, dv = attention_bwd_ref(grad_out, q, k, v, allowed, dropout_p=dropout_p, scale=scale, seed=seed)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, seed, num_query, mode, dropout_p, scale, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, seed, num_query, mode, dropout_p, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, seed)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero-filled tensor for it
    ctx.args = (num_query, mode, dropout_p, scale, backend)


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 10
    q, k, v, out, lse, kpm, seed = ctx.saved_tensors
    dq, dk, dv = _bwd(grad_out.contiguous(), q, k, v, out, lse, kpm, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("blipfast::qformer_attention_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def qformer_attention(q, k, v, *, num_query, mode, key_padding_mask=None, dropout_p=0.0, scale=None, seed=None,
                      backend=None):
    """Q-Former self-attention with an index-computed mask; returns [B, Lq, H, D] (see module doc).

    ``seed`` (int or int64 tensor with one element) fixes the dropout mask (the Philox rule, identical on
    every backend); by default a fresh one is drawn on the device from torch's RNG, and the "torch"
    backend uses torch's own dropout, so ``torch.manual_seed`` makes a run reproducible either way.
    """
    C.check_tensor(_OP, "q", q, ndim=4)
    dev = q.device
    C.check_tensor(_OP, "k", k, ndim=4, device=dev)
    C.check_tensor(_OP, "v", v, ndim=4, device=dev)
    C.check_same_dtype(_OP, q=q, k=k, v=v)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if d == 0:
        raise ValueError(f"{_OP}: q must have a non-empty head dimension, got shape {tuple(q.shape)}")
    C.check_shape(_OP, "k", k, (b, None, h, d))
    C.check_shape(_OP, "v", v, (b, lk, h, d))
    if lq > lk:
        raise ValueError(f"{_OP}: q has Lq={lq} rows but k has only Lk={lk} keys; the rows must be the last Lq "
                         f"positions of the key sequence (Lq <= Lk)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_inner_contiguous(_OP, name, t)
    if isinstance(num_query, bool) or not isinstance(num_query, int):
        raise TypeError(f"{_OP}: num_query must be an int, got {type(num_query).__name__}")
    if not 0 <= num_query <= lk:
        raise ValueError(f"{_OP}: num_query must be in [0, Lk={lk}], got {num_query}")
    if mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    if mode == "itc_itg" and (lk - num_query) % 2:
        raise ValueError(f"{_OP}: mode 'itc_itg' needs Lk = num_query + 2T (two copies of the text), got Lk={lk}, "
                         f"num_query={num_query}")
    kpm = C.as_key_padding_mask(_OP, "key_padding_mask", key_padding_mask, (b, lk), dev)
    dropout_p = C.check_probability(_OP, "dropout_p", dropout_p)
    scale = C.check_positive_float(_OP, "scale", scale)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    seed = C.check_seed(_OP, seed, dev)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, q.dtype)
    if backend == "torch" and dropout_p > 0.0 and seed is None:
        # nothing to reproduce: plain autograd with torch's own dropout (the Philox rule in PyTorch
        # costs ~120 integer passes per element, which would dominate CPU training)
        return qformer_attention_ref(q, k, v, num_query=num_query, mode=mode, key_padding_mask=kpm,
                                     dropout_p=dropout_p, scale=scale)
    if dropout_p > 0.0 and seed is None:
        seed = new_seed(dev)
    return _fwd(q, k, v, kpm, seed if dropout_p > 0.0 else None, num_query, mode, dropout_p, scale, backend)[0]
