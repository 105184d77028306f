"""Cross-entropy of a linear layer (an LM head) without its [rows, vocab] logits in memory.

``linear_cross_entropy(x, weight, bias, targets, label_smoothing=ls)`` is

    F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=-100, label_smoothing=ls)

(the mean over the rows whose target is not -100; 0 when there is none, where PyTorch's mean is 0/0) for x [N, d],
weight [V, d], bias None or [V], targets [N] int64 in [0, V) or -100. Plain autograd keeps the N x V logits (or
their log-probabilities) for the backward: with BLIP's 30524-token vocabulary that is the largest activation of a
training step. Here the logits are made ``chunk`` rows at a time, reduced to one log-sum-exp per row, and made again
in the backward: saved are x, the targets, the log-sum-exps and the count of rows with a target (one more GEMM of
the head per step instead of N x V floats).

Each row costs lse - (1 - ls) z_t - ls mean_j z_j (z the row's logits in fp32, t its target), the label-smoothed
cross-entropy of PyTorch; its gradient with respect to the logits is softmax(z) - (1 - ls) onehot(t) - ls / V.

Autocast: the GEMMs run in the dtype ``F.linear`` would run in (autocast's where it is on), forward and backward;
the log-sum-exps, the loss and the bias gradient accumulate in fp32 (fp64 for fp64 inputs); each gradient comes
back in its input's dtype. The loss is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common as C

_OP = "linear_cross_entropy"
_SUPPORTED = ("torch",)
IGNORE_INDEX = -100


def linear_cross_entropy_ref(x, weight, bias, targets, *, label_smoothing=0.0):
    """Pure-PyTorch reference (materialises the logits); differentiable."""
    logits = F.linear(x, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                            reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1).to(total.dtype)


# ----------------------------------------------------------------------------------------------
# the custom ops and their implementation: x is in the GEMM dtype; weight and bias in theirs (cast to x's
# dtype inside)


def _fwd_torch(x, weight, bias, targets, label_smoothing, chunk):
    n, dt, acc = x.shape[0], x.dtype, C.acc_dtype(x)
    w, b = weight.to(dt), (None if bias is None else bias.to(dt))
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp_min(1).to(acc)
    lse = torch.empty(n, dtype=acc, device=x.device)
    total = torch.zeros((), dtype=acc, device=x.device)
    for r in range(0, n, chunk):
        logits = F.linear(x[r:r + chunk], w, b).to(acc)
        lse_c = torch.logsumexp(logits, dim=1)
        lse[r:r + chunk] = lse_c
        z_t = logits.gather(1, targets[r:r + chunk].clamp_min(0).unsqueeze(1)).squeeze(1)
        row = lse_c - (1.0 - label_smoothing) * z_t - label_smoothing * logits.mean(dim=1)
        total = total + torch.where(valid[r:r + chunk], row, 0.0).sum()
    return total / count, lse, count


def _bwd_torch(grad_loss, x, weight, bias, targets, lse, count, label_smoothing, chunk, need_x, need_weight,
               need_bias):
    n, v, dt, acc = x.shape[0], weight.shape[0], x.dtype, lse.dtype
    ls = label_smoothing
    w, b = weight.to(dt), (None if bias is None else bias.to(dt))
    scale = grad_loss.to(acc) / count
    gx = torch.empty(x.shape, dtype=dt, device=x.device) if need_x else None
    gw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_weight else None
    gb = torch.zeros(v, dtype=acc, device=x.device) if need_bias else None
    for r in range(0, n, chunk):
        xc, tgt = x[r:r + chunk], targets[r:r + chunk]
        logits = F.linear(xc, w, b)
        grad = torch.exp(logits.to(acc) - lse[r:r + chunk].unsqueeze(1)) - ls / v  # d loss / d logits, per row
        grad.scatter_add_(1, tgt.clamp_min(0).unsqueeze(1),
                          torch.full((grad.shape[0], 1), ls - 1.0, dtype=acc, device=x.device))
        grad = grad * torch.where(tgt != IGNORE_INDEX, scale, 0.0).unsqueeze(1)
        gl = grad.to(dt)
        if gx is not None:
            gx[r:r + chunk] = gl @ w
        if gw is not None:
            gw += (gl.t() @ xc).to(acc)
        if gb is not None:
            gb += grad.sum(0)
    return (x.new_empty(0) if gx is None else gx, x.new_empty(0) if gw is None else gw.to(weight.dtype),
            x.new_empty(0) if gb is None else gb.to(bias.dtype))


@torch.library.custom_op("blipfast::linear_cross_entropy_fwd", mutates_args=())
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
         label_smoothing: float, chunk: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, lse [N], count): the log-sum-exp of each row's logits and the number of rows with a target
    (at least 1), both in the accumulation dtype and saved for the backward."""
    with C.no_autocast(x.device):
        return _fwd_torch(x, weight, bias, targets, label_smoothing, chunk)


@_fwd.register_fake
def _fwd_fake(x, weight, bias, targets, label_smoothing, chunk, backend):
    acc = C.acc_dtype(x)
    return x.new_empty((), dtype=acc), x.new_empty((x.shape[0],), dtype=acc), x.new_empty((), dtype=acc)


@torch.library.custom_op("blipfast::linear_cross_entropy_bwd", mutates_args=())
def _bwd(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         targets: torch.Tensor, lse: torch.Tensor, count: torch.Tensor, label_smoothing: float, chunk: int,
         need_x: bool, need_weight: bool, need_bias: bool, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d x in x's dtype, d weight, d bias in theirs); a gradient that is not needed is an empty tensor."""
    with C.no_autocast(x.device):
        return _bwd_torch(grad_loss, x, weight, bias, targets, lse, count, label_smoothing, chunk, need_x,
                          need_weight, need_bias)


@_bwd.register_fake
def _bwd_fake(grad_loss, x, weight, bias, targets, lse, count, label_smoothing, chunk, need_x, need_weight, need_bias,
              backend):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else x.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, targets, label_smoothing, chunk, backend = inputs
    _, lse, count = output
    ctx.save_for_backward(x, weight, bias, targets, lse, count)  # no logits: recomputed chunk by chunk
    ctx.set_materialize_grads(False)  # lse and count get no gradient: no zero-filled tensors for them
    ctx.args = (label_smoothing, chunk, backend)


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 7
    x, weight, bias, targets, lse, count = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    ls, chunk, backend = ctx.args
    gx, gw, gb = _bwd(grad_loss, x, weight, bias, targets, lse, count, ls, chunk, need_x, need_w, need_b, backend)
    return gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None, None, None


torch.library.register_autograd("blipfast::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)


def linear_cross_entropy(x, weight, bias, targets, *, label_smoothing=0.0, chunk=1024, backend=None):
    """``F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=-100, label_smoothing=...)`` (the mean over
    the rows with a target; 0 when there is none) without keeping the [N, V] logits for the backward (see the module
    doc): x [N, d], weight [V, d], bias None or [V], targets [N] int64 (-100: no target). ``chunk``: rows of logits
    made at a time, in the forward and again in the backward. Under autocast the GEMMs run in autocast's dtype."""
    C.check_tensor(_OP, "x", x, ndim=2)
    dev = x.device
    n, d = x.shape
    C.check_tensor(_OP, "weight", weight, ndim=2, device=dev)
    C.check_shape(_OP, "weight", weight, (None, d))
    v = weight.shape[0]
    if v == 0:
        raise ValueError(f"{_OP}: weight must have at least one row (class), got shape {tuple(weight.shape)}")
    if bias is not None:
        C.check_tensor(_OP, "bias", bias, device=dev)
        C.check_shape(_OP, "bias", bias, (v,))
    C.check_tensor(_OP, "targets", targets, dtypes=(torch.int64,), device=dev)
    C.check_shape(_OP, "targets", targets, (n,))
    label_smoothing = C.check_unit_interval(_OP, "label_smoothing", label_smoothing)
    chunk = C.check_positive_int(_OP, "chunk", chunk)
    dt = C.gemm_dtype(_OP, dev, x=x, weight=weight, bias=bias)
    C.check_index_range(_OP, "targets", targets, v, "the classes, weight.shape[0]", ignore=IGNORE_INDEX)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, dt)
    return _fwd(x.to(dt), weight, bias, targets, label_smoothing, chunk, backend)[0]
