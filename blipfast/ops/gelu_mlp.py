"""The GELU feed-forward block without its activation in memory: ``y = gelu(x W1^T + b1) W2^T``.

Plain autograd keeps both the pre-activation u = x W1^T + b1 and the activation gelu(u), two [rows, intermediate]
tensors per FFN (intermediate = 4 x hidden in BERT, the Q-Former and ViT). ``gelu_mlp`` saves x and u only and
recomputes gelu(u) in the backward (one elementwise pass): one activation tensor of the FFN less per layer. The
output bias b2 is left out: the post-LN epilogue (``bias_dropout_add_layernorm``) or the caller adds it.

x [..., d], w1 [H, d], b1 None or [H], w2 [O, H]; ``approximate`` is F.gelu's ("none" or "tanh"), in the forward
and in the backward.

Autocast: both GEMMs and the GELU run in the dtype ``F.linear`` would run in (autocast's where it is on), forward
and backward (saved: x and u in that dtype, as autocast's own linear saves them); the bias gradient accumulates in
fp32 (fp64 for fp64 inputs); each gradient comes back in its input's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common as C

_OP = "gelu_mlp"
_SUPPORTED = ("torch",)
APPROXIMATE = ("none", "tanh")


def gelu_mlp_ref(x, w1, b1, w2, *, approximate="none"):
    """Pure-PyTorch reference; differentiable."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2)


# ----------------------------------------------------------------------------------------------
# the custom ops and their implementation, over x [R, d] in the GEMM dtype; the weights in theirs (cast to
# x's dtype inside)


def _fwd_torch(x, w1, b1, w2, approximate):
    dt = x.dtype
    u = F.linear(x, w1.to(dt), None if b1 is None else b1.to(dt))
    return F.linear(F.gelu(u, approximate=approximate), w2.to(dt)), u


def _bwd_torch(grad_y, x, u, w1, w2, approximate, need_x, need_w1, need_w2, b1_dtype):
    dt = u.dtype
    gy = grad_y.to(dt)
    gw2 = (gy.t() @ F.gelu(u, approximate=approximate)).to(w2.dtype) if need_w2 else x.new_empty(0)  # recomputed
    gu = torch.ops.aten.gelu_backward(gy @ w2.to(dt), u, approximate=approximate)
    gx = gu @ w1.to(dt) if need_x else x.new_empty(0)
    gw1 = (gu.t() @ x).to(w1.dtype) if need_w1 else x.new_empty(0)
    gb1 = gu.sum(0, dtype=C.acc_dtype(u)).to(b1_dtype) if b1_dtype is not None else x.new_empty(0)
    return gx, gw1, gb1, gw2


@torch.library.custom_op("blipfast::gelu_mlp_fwd", mutates_args=())
def _fwd(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, approximate: str,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y [R, O], u [R, H]): the output and the pre-activation (saved for the backward)."""
    with C.no_autocast(x.device):
        return _fwd_torch(x, w1, b1, w2, approximate)


@_fwd.register_fake
def _fwd_fake(x, w1, b1, w2, approximate, backend):
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


@torch.library.custom_op("blipfast::gelu_mlp_bwd", mutates_args=())
def _bwd(grad_y: torch.Tensor, x: torch.Tensor, u: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
         approximate: str, need_x: bool, need_w1: bool, need_w2: bool, b1_dtype: Optional[torch.dtype],
         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d x in x's dtype, d w1, d b1 in ``b1_dtype``, d w2); a gradient that is not needed (``b1_dtype``
    None: no bias gradient) is an empty tensor."""
    with C.no_autocast(x.device):
        return _bwd_torch(grad_y, x, u, w1, w2, approximate, need_x, need_w1, need_w2, b1_dtype)


@_bwd.register_fake
def _bwd_fake(grad_y, x, u, w1, w2, approximate, need_x, need_w1, need_w2, b1_dtype, backend):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0), w1.new_empty(w1.shape) if need_w1 else x.new_empty(0),
            x.new_empty((w1.shape[0],), dtype=b1_dtype) if b1_dtype is not None else x.new_empty(0),
            w2.new_empty(w2.shape) if need_w2 else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, approximate, backend = inputs
    ctx.save_for_backward(x, output[1], w1, w2)  # x and u; gelu(u) is recomputed
    ctx.set_materialize_grads(False)  # u gets no gradient: no zero-filled tensor for it
    ctx.args = (approximate, backend)
    ctx.b1_dtype = None if b1 is None else b1.dtype


def _backward(ctx, grad_y, grad_u_unused):
    if grad_y is None:
        return (None,) * 6
    x, u, w1, w2 = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad[:4]
    approximate, backend = ctx.args
    b1_dtype = ctx.b1_dtype if need_b1 else None
    gx, gw1, gb1, gw2 = _bwd(grad_y, x, u, w1, w2, approximate, need_x, need_w1, need_w2, b1_dtype, backend)
    return (gx if need_x else None, gw1 if need_w1 else None, gb1 if b1_dtype is not None else None,
            gw2 if need_w2 else None, None, None)


torch.library.register_autograd("blipfast::gelu_mlp_fwd", _backward, setup_context=_setup_context)


def gelu_mlp(x, w1, b1, w2, *, approximate="none", backend=None):
    """``F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2)`` (the FFN without its output bias)
    whose backward recomputes the GELU instead of keeping its [rows, H] output (see the module doc): x [..., d],
    w1 [H, d], b1 None or [H], w2 [O, H]. Under autocast the GEMMs run in autocast's dtype."""
    C.check_tensor(_OP, "x", x)
    dev = x.device
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{_OP}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    C.check_tensor(_OP, "w1", w1, ndim=2, device=dev)
    C.check_shape(_OP, "w1", w1, (None, d))
    h = w1.shape[0]
    if b1 is not None:
        C.check_tensor(_OP, "b1", b1, device=dev)
        C.check_shape(_OP, "b1", b1, (h,))
    C.check_tensor(_OP, "w2", w2, ndim=2, device=dev)
    C.check_shape(_OP, "w2", w2, (None, h))
    if approximate not in APPROXIMATE:
        raise ValueError(f"{_OP}: approximate must be one of {APPROXIMATE}, got {approximate!r}")
    dt = C.gemm_dtype(_OP, dev, x=x, w1=w1, b1=b1, w2=w2)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, dt)
    shape = x.shape
    # 2-D GEMMs: no view/unview around each of them
    y = _fwd(x.reshape(-1, d).to(dt), w1, b1, w2, approximate, backend)[0]
    return y.view(*shape[:-1], w2.shape[0])
